#!/bin/sh
# Run by the Bento's Dockerfile (as root, after the bentoml user exists): the directories
# the service, the Celery worker and beat write to, owned by that user (uid 1034).
set -eu
install -d -m 0750 -o bentoml -g bentoml /var/lib/flood /var/lib/flood/backups /var/lib/flood/journal /var/lib/flood/beat
