"""Data for pruning decisions and their evaluation: calibration images, labelled evaluation sets,
and a small ViT trained here on a dataset that ships with scikit-learn (digits), so accuracy can
be measured without downloads."""

from vitsparse.data.digits import DIGITS_MODEL, digits_split, digits_vit

__all__ = ["DIGITS_MODEL", "digits_split", "digits_vit"]
