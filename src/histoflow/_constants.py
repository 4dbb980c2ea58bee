"""All key names histoflow reads and writes, in one place."""

from __future__ import annotations

__all__ = ["Key", "DEFAULT_SPOT_DIAMETER_UM"]


class Key:
    """Names of the tables, columns, layers and entries histoflow uses by default.

    Readers (:mod:`histoflow.io`, :mod:`histoflow.datasets`) write these; every public function
    takes the matching keyword (``library_key=``, ``cancer_type_key=``, ...) to read other names.
    """

    # SpatialData elements
    table = "table"
    region = "region"  # region_key of the table (one shapes element per slide)
    instance = "spot_id"  # instance_key of the table (index of the shapes element)

    # obs columns
    library = "library_id"
    patient = "patient"
    cancer_type = "cancer_type"
    organ = "organ"
    species = "species"
    technology = "technology"
    pixel_size = "pixel_size_um"  # micrometres per full-resolution pixel
    spot_diameter = "spot_diameter_um"
    split = "split"

    # obsm / layers
    spatial = "spatial"  # spot centres, full-resolution pixels (x, y)
    counts = "counts"
    log1p = "log1p"

    # var / uns
    panel = "histoflow_panel"

    @staticmethod
    def embedding(name: str) -> str:
        """``obsm`` key of patch features computed with encoder ``name``."""
        return f"X_{name}"

    @staticmethod
    def full_image(library_id: str) -> str:
        """Name of the full-resolution image element of one slide."""
        return f"{library_id}_full_image"

    @staticmethod
    def downscaled_image(library_id: str) -> str:
        """Name of a downscaled image element of one slide (used when no full-resolution image exists)."""
        return f"{library_id}_downscaled_image"


#: Spot diameters in micrometres by technology (used to infer a pixel size when metadata lack it).
DEFAULT_SPOT_DIAMETER_UM: dict[str, float] = {
    "visium": 55.0,
    "spatial transcriptomics": 100.0,
    "st": 100.0,
}
