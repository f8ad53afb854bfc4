"""Trackers: camera frames to driving expressions (landmarks, smoothing, head fits)."""
