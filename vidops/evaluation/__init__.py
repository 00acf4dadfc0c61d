"""Video metrics, prompt adherence and reports."""
