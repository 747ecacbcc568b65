"""Graph-rewrite passes, one small file each; ``pipeline.py`` lists them in order."""
