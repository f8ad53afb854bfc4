"""Thin ROS 2 adapters over the plain-Python core: parameters, QoS, message conversion."""
