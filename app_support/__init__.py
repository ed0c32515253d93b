"""The pieces of the Gradio demo (``app.py``): one concept per module, each importable and testable without a server.

Dependency direction: ``app_support`` uses ``ddetr`` and ``finetune``; neither of them imports anything from here.
"""
