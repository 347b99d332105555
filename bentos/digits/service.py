"""The digits model as a BentoML service: everything but its name is mlkit's (`mlkit.service.bento_service`)."""
from mlkit.service import bento_service

svc = bento_service("digits")
