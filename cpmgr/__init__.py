"""cpmgr: a consumer-group checkpoint manager sidecar for Alibaba Cloud Log Service."""

__version__ = "0.1.0"
