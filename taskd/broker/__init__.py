"""Talking to RabbitMQ: URLs and connections, topology, publishing.

Importing this package corrects pika's handling of floating-point header
values (see :mod:`taskd.broker.fields`) for the whole process.
"""
from . import fields

fields.install()
