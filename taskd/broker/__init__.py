"""Talking to RabbitMQ: URLs and connections, topology, publishing.

Importing this package corrects pika's handling of floating-point header
values (see :mod:`taskd.broker.pikashim`) for the whole process.
"""
from . import pikashim

pikashim.install()
