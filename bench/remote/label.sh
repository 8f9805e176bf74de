# After the last chunk: convert the LLM (the SLM converted in the background earlier), label on the GPU, train.
source bench/remote/env.sh; mkdir -p /root/out
T0=$(date +%s)
python3 bench/remote/convert_shipped.py llm 2>&1 | grep -v Loading | tail -3
while [ ! -f /root/slm.done ]; do sleep 2; done; tail -2 /root/conv-slm.log
echo "models ready: $(( $(date +%s) - T0 )) s"
python3 -m r2r_serve.training.cli label --out /root/run --prompts 1000 --max-new-tokens 192 --continue-tokens 16 \
  --device cuda --slm-dtype float32 --llm-dtype float32 --gen-batch 128 --teacher-batch 32 --continue-batch 256 \
  --judge-batch 128 2>&1 | grep -v "Loading\|━" | tail -25
echo "labeled: $(( $(date +%s) - T0 )) s"
cp /root/run/dataset/stats.json /root/out/label-stats.json
bash bench/remote/train_variants.sh
echo "trained: $(( $(date +%s) - T0 )) s"
