"""GAGAvatar training: dataset building from videos, losses, and the (multi-GPU) trainer."""
