"""GAGAvatar (Chu & Harada, NeurIPS 2024) re-implemented with the published checkpoint layout."""

from gaga_ros.avatar.gagavatar.checkpoint import CheckpointError, load_state_dict_strict, read_state_dict
from gaga_ros.avatar.gagavatar.model import GagaFrame, GagaInputError, GagaSource, GAGAvatar, source_image
from gaga_ros.avatar.gagavatar.sizes import FULL, TINY, GagaSizes

__all__ = ["FULL", "TINY", "CheckpointError", "GAGAvatar", "GagaSizes", "GagaFrame", "GagaInputError",
           "GagaSource", "load_state_dict_strict", "read_state_dict", "source_image"]
