"""The metrics every evaluation reports, by column name of ``metrics.csv`` (no torch needed to read runs)."""

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_ap", "pixel_f1", "pixel_aupro",
               "pixel_aupro_cflow")
