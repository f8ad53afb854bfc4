"""Conventions every layer shares: the published GAGAvatar model's crop, camera and FLAME constants.

Not settings: changing one breaks compatibility with the published weights and tracker records.
docs/camera.md, docs/crop.md and docs/flame.md explain them; parameter profiles live in config/.
"""

#: Side of the square head crop that models and cameras assume, in pixels.
CROP_SIZE = 512
#: The head box is expanded to a square of this factor times sqrt(w*h) before cropping.
CROP_SCALE = 1.65
#: NDC focal length of the GAGAvatar camera (pixel focal = FOCAL * CROP_SIZE / 2).
FOCAL = 12.0
#: Typical camera distance of a tracked head, in FLAME metres x 5.
CAMERA_DISTANCE = 9.0
#: FLAME's scale in GAGAvatar: vertices are multiplied by this after skinning.
FLAME_SCALE = 5.0
#: Side of the dual-lifting feature plane of the published model.
PLANE_SIZE = 296
#: Vertices of FLAME (with eyes), the expression branch's 3DMM.
FLAME_VERTICES = 5023
#: Landmarks of mediapipe FaceMesh with refined iris.
MESH_LANDMARKS = 478
#: Maximum number of FLAME expression coefficients a message may carry.
MAX_EXPRESSION_COEFFS = 100
