"""KFP components: one module per stage, each a thin lightweight-Python-component wrapper
over a vidops stage function. The function bodies are shipped to the cluster as source and
run in the project image, so they import vidops inside the body."""
