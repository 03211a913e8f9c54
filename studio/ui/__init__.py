"""The Gradio web studio (`python app.py` or `studio ui`): tabs over the Python API, training jobs in worker
processes (studio.ui.jobs, studio.ui.worker)."""
