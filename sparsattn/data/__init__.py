"""Local data sources: text corpora read from files already on the machine (nothing is downloaded)."""
from .corpus import source_files, read_source_text
from .prose import is_prose_line, prose_files, prose_lines

__all__ = ["source_files", "read_source_text", "prose_files", "prose_lines", "is_prose_line"]
