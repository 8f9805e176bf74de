# Sourced at the start of every device command: our pinned wheels, the project importable, offline.
export REPO=$PWD
if [ ! -f /tmp/site/.done ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.done
fi
mkdir -p /tmp/pkgs && ln -sfn $REPO/services /tmp/pkgs/r2r_serve && ln -sfn $REPO/clients/python/r2r_client /tmp/pkgs/r2r_client
export PYTHONPATH=/tmp/pkgs:/tmp/site:$REPO
export HF_HUB_OFFLINE=1 R2R_CACHE_DIR=/root/r2rcache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /root/ship
for c in .ship/c*; do [ -f "$c" ] && mv "$c" /root/ship/; done
echo "chunks on device: $(ls /root/ship | wc -l) ($(du -sm /root/ship | cut -f1) MB)"
