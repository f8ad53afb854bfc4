"""GAGAvatar (Chu & Harada, NeurIPS 2024) re-implemented with the published checkpoint layout."""

from gaga_ros.avatar.gagavatar.checkpoint import CheckpointError, load_state_dict_strict, read_state_dict
from gaga_ros.avatar.gagavatar.config import FULL, TINY, GagaConfig
from gaga_ros.avatar.gagavatar.model import GagaFrame, GagaInputError, GagaSource, GAGAvatar, source_image

__all__ = ["FULL", "TINY", "CheckpointError", "GAGAvatar", "GagaConfig", "GagaFrame", "GagaInputError",
           "GagaSource", "load_state_dict_strict", "read_state_dict", "source_image"]
