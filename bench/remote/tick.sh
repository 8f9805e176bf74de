# Every chunk call: start the SLM conversion once its bytes are all here; show the background jobs' progress.
n=$(ls /root/ship | wc -l)
if [ "$n" -ge 9 ] && [ ! -f /root/slm.started ]; then
  touch /root/slm.started
  setsid nohup python3 bench/remote/convert_shipped.py slm > /root/conv-slm.log 2>&1 < /dev/null &
  echo "SLM conversion started"
fi
[ -f /root/smoke.log ] && { echo "--- smoke:"; grep -v "━\|Loading\|Warning\|forward_call" /root/smoke.log | tail -${SMOKE_LINES:-4}; }
[ -f /root/conv-slm.log ] && { echo "--- slm conversion:"; tail -2 /root/conv-slm.log; }
true
