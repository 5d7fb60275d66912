"""graphpatch run puts this folder on the child's PYTHONPATH, for its sitecustomize."""
