"""The names of a run folder's files: ``pretrain`` writes them, ``evaluate`` and ``compare`` read them."""

BACKBONE_NAME = "backbone.pt"  # the trained backbone alone, a plain state_dict
BACKBONE_META_NAME = "backbone.json"  # what rebuilds and feeds it: backbone name, image size, normalisation
CONFIG_NAME = "config.json"  # the run's options
METRICS_NAME = "metrics.jsonl"  # one record per epoch
STEPS_NAME = "steps.jsonl"  # running means every --log-every steps
SKIPPED_IMAGES_NAME = "skipped_images.txt"  # an image folder's unreadable files
CURVES_NAME = "training_curves.png"
FEATURES_DIR_NAME = "features"  # evaluate's feature caches, beside the weights

#: The files pretrain writes in a run folder besides its checkpoints.
RUN_FILE_NAMES = (BACKBONE_NAME, BACKBONE_META_NAME, CONFIG_NAME, METRICS_NAME, STEPS_NAME, SKIPPED_IMAGES_NAME,
                  CURVES_NAME)

#: What config.json records beside the run's options: the data's geometry (image size, normalisation, the
#: augmentation path) and the number of processes (--batch-size is per process). A config file passes them over.
RUN_RECORDS = ("geometry", "processes")
