from .sources import Dataset, load_dataset, load_mnist10k, canonical_split
from .idx import read_idx, write_idx, load_idx_folder
from .preprocess import preprocess_1989
from .augment import shift_images, pass_randomness

__all__ = ["Dataset", "load_dataset", "load_mnist10k", "canonical_split", "read_idx", "write_idx",
           "load_idx_folder", "preprocess_1989", "shift_images", "pass_randomness"]
