#!/bin/sh
# Run by the Bento's Dockerfile (as root, after the bentoml user exists): the directories
# the service, the Celery worker and beat write to, owned by that user (uid 1034), and the
# `flood` command on PATH for `docker compose exec <service> flood ...`.
set -eu
install -d -m 0750 -o bentoml -g bentoml /var/lib/flood /var/lib/flood/backups /var/lib/flood/journal /var/lib/flood/beat
cat >/usr/local/bin/flood <<'FLOOD'
#!/bin/sh
# The Bento's own sources (src/, cli/ included) in the Bento's virtualenv.
PYTHONPATH="$BENTO_PATH/src${PYTHONPATH:+:$PYTHONPATH}" exec /app/.venv/bin/python -m cli.main "$@"
FLOOD
chmod 0755 /usr/local/bin/flood
