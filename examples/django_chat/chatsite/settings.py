"""Settings of the course chat site: a Django project whose channel layer is the channelbus broker.

Environment variables:

- ``CHANNELBUS_BROKER``: the broker URL (default ``tcp://127.0.0.1:5555``), or several,
  comma-separated, for a sharded bus.
- ``DJANGO_SECRET_KEY``, ``DJANGO_DEBUG`` (``1`` or ``0``, default ``1``),
  ``DJANGO_ALLOWED_HOSTS`` (comma separated, default ``127.0.0.1,localhost``).

No database and no authentication: a person says who they are with the ``name`` query parameter.

For a broker that uses CURVE keys, serve the site with ``chatsite.settings_keys`` (these settings
plus the site's keys, from ``CHANNELBUS_SECRET_KEY`` and ``CHANNELBUS_SERVER_KEY``).
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-channelbus-example-only")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

INSTALLED_APPS = [
    "daphne",  # makes `manage.py runserver` serve ASGI with daphne
    "django.contrib.staticfiles",
    "chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]

ROOT_URLCONF = "chatsite.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    },
]

ASGI_APPLICATION = "chatsite.asgi.application"

DATABASES = {}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "clients.channel_layer.BusChannelLayer",
        "CONFIG": {
            "hosts": os.environ.get("CHANNELBUS_BROKER", "tcp://127.0.0.1:5555"),  # (a,b: sharded)
        },
    },
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
