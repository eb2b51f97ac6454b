export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
B=150
run() { taskset -c $1 python3 -m tasks._probe_learn $2 "$3" $B > $OUT/$4.log 2>&1 & }
run 0,1 selective_copy '{"seq_len":32,"num_tokens":8}' sc32_8
run 2,3 selective_copy '{"seq_len":32,"num_tokens":4}' sc32_4
run 4,5 selective_copy '{"seq_len":48,"num_tokens":6}' sc48_6
run 6,7 needle '{"num_needles":2,"num_queries":1}' needle2_1
run 8,9 needle '{"num_needles":4,"num_queries":1}' needle4_1
run 10,11 copy '{"seq_len":24,"copy_len":12}' copy12
run 12,13 mqar '{"num_kv_pairs":6,"seq_len":48}' mqar6
run 14,15 needle '{"num_needles":2,"num_queries":2,"seq_len":32}' needle2_2
wait
grep -h RESULT $OUT/*.log
