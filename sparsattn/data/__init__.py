"""Local data sources: text corpora read from files already on the machine (nothing is downloaded)."""
from .corpus import source_files, read_source_text

__all__ = ["source_files", "read_source_text"]
