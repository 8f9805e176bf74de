"""R2R token routing served as asynchronous gRPC microservices."""

__version__ = "0.1.0"
