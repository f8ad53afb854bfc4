"""gaga_ros: live Gaussian telepresence heads for robots.

The plain-Python core (no ROS imports) lives in the subpackages named for the data flow:
capture -> tracking -> expression -> avatar/render -> stream. ROS adapters live in `gaga_ros.nodes`.
"""

# The generated interfaces (gaga_ros.msg, gaga_ros.srv) live in the colcon install space, which
# the pip path puts on sys.path: let this package span both directories.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)

__version__ = "0.1.0"
