"""The job contract shared by producers and the worker: no mlx, no Redis client code."""
