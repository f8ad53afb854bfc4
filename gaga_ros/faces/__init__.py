"""Face models: the point sets an avatar is driven by (mediapipe FaceMesh; FLAME elsewhere)."""
