"""Preprocessing: patch features, normalisation, gene panels, slide splits."""

from __future__ import annotations

from histoflow.pp._encoders import Encoder, get_encoder, list_encoders
from histoflow.pp._features import scale_features
from histoflow.pp._gene_embeddings import gene_embeddings_from_gene_sets, read_gene_embeddings
from histoflow.pp._genes import select_genes
from histoflow.pp._normalize import normalize
from histoflow.pp._patches import crop_patches, embed_patches
from histoflow.pp._split import split_from_csv, split_slides

__all__ = [
    "embed_patches",
    "crop_patches",
    "get_encoder",
    "list_encoders",
    "Encoder",
    "normalize",
    "scale_features",
    "select_genes",
    "gene_embeddings_from_gene_sets",
    "read_gene_embeddings",
    "split_slides",
    "split_from_csv",
]
