"""mediapipe FaceMesh (refined, 478 landmarks) behind a small typed interface.

The solution graph keeps tracking a face from the previous frame's landmarks and only runs the face
detector when it loses it, so in video mode a detection score exists only on (re)detection frames. A
face's score is that detector score, carried over while mediapipe keeps tracking (the graph drops the
face once its internal presence score falls below min_confidence).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mediapipe.python.solution_base import SolutionBase
from mediapipe.python.solutions import face_mesh

from gaga_ros.conventions import MESH_LANDMARKS
from gaga_ros.errors import InputError
from gaga_ros.image import check_rgb


@dataclass(frozen=True)
class Face:
    """One face's landmarks: (478, 3) float32 pixels (x right, y down, z depth scaled like x)."""

    points: np.ndarray
    score: float


class FaceLandmarker:
    """FaceMesh with refined iris landmarks, returning pixel-space landmarks per face."""

    def __init__(self, static_image_mode: bool = False, max_faces: int = 1, min_confidence: float = 0.5):
        if not 0.0 <= min_confidence <= 1.0:
            raise InputError(f"min_confidence {min_confidence!r}: accepted is a value in [0, 1]")
        if int(max_faces) < 1:
            raise InputError(f"max_faces {max_faces!r}: accepted is a positive integer")
        # FaceMesh's own graph, asking also for its detector output (the solution API's constructor
        # exposes only the landmarks); the calculator options are those of face_mesh.FaceMesh.
        self._graph = SolutionBase(
            binary_graph_path=face_mesh._BINARYPB_FILE_PATH,
            side_inputs={"num_faces": int(max_faces), "with_attention": True,
                         "use_prev_landmarks": not static_image_mode},
            calculator_params={
                "facedetectionshortrangecpu__facedetectionshortrange__facedetection__"
                "TensorsToDetectionsCalculator.min_score_thresh": min_confidence,
                "facelandmarkcpu__ThresholdingCalculator.threshold": min_confidence,
            },
            outputs=["multi_face_landmarks", "face_detections"])
        self._min_confidence = float(min_confidence)
        self._scores: list[tuple[np.ndarray, float]] = []  # (face centre, detector score) being tracked

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Landmarks of every face in an RGB image (empty when there is none)."""
        rgb = check_rgb(rgb)
        h, w = rgb.shape[:2]
        result = self._graph.process({"image": rgb})
        if not result.multi_face_landmarks:
            self._scores = []
            return []
        scale = np.array([w, h, w], np.float32)
        faces_pts = [np.array([(p.x, p.y, p.z) for p in lm.landmark], np.float32) * scale
                     for lm in result.multi_face_landmarks]
        if result.face_detections:
            known = [(self._box_centre(d, w, h), float(d.score[0])) for d in result.face_detections]
        else:
            known = self._scores
        faces, self._scores = [], []
        for pts in faces_pts:
            if pts.shape[0] != MESH_LANDMARKS:
                continue
            centre = pts[:, :2].mean(0)
            score = (min(known, key=lambda k: np.linalg.norm(k[0] - centre))[1] if known
                     else self._min_confidence)
            faces.append(Face(pts, score))
            self._scores.append((centre, score))
        return faces

    @staticmethod
    def _box_centre(detection, w: int, h: int) -> np.ndarray:
        box = detection.location_data.relative_bounding_box
        return np.array([(box.xmin + box.width / 2) * w, (box.ymin + box.height / 2) * h])

    def close(self) -> None:
        """Release the mediapipe graph."""
        self._graph.close()

    def __enter__(self) -> FaceLandmarker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
