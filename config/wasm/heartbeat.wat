;; heartbeat: prints "beat N" every 100 ms on stdout, forever.
;; With one argument (`--arg 5` on the runner) it stops after that many beats and
;; returns normally from _start, which the runner reports as `exit:0`.
;;
;; The sleep uses WASI poll_oneoff with a single relative monotonic-clock
;; subscription: the thread blocks in the host, so an idle tenant costs no CPU
;; (and no wasmtime fuel).
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get"
    (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)

  ;; Layout: 0..48 subscription, 64..96 event, 100 nevents, 104 iovec,
  ;; 112 nwritten, 120 argc, 124 argv buf size, 200..232 digit scratch,
  ;; 256.. output line, 512 prefix text, 1024 argv pointers, 2048 argv strings.
  (data (i32.const 512) "beat ")

  ;; Writes the decimal form of $n at $dst and returns its length.
  (func $fmt_u64 (param $n i64) (param $dst i32) (result i32)
    (local $p i32) (local $len i32)
    (local.set $p (i32.const 232))
    (loop $digits
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i64.store8 (local.get $p)
        (i64.add (i64.const 48) (i64.rem_u (local.get $n) (i64.const 10))))
      (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
      (br_if $digits (i64.ne (local.get $n) (i64.const 0))))
    (local.set $len (i32.sub (i32.const 232) (local.get $p)))
    (memory.copy (local.get $dst) (local.get $p) (local.get $len))
    (local.get $len))

  ;; Prints "<prefix><n>\n" to fd 1 with a single fd_write (one line, one write).
  (func $print_line (param $prefix i32) (param $prefix_len i32) (param $n i64)
    (local $len i32)
    (memory.copy (i32.const 256) (local.get $prefix) (local.get $prefix_len))
    (local.set $len (i32.add (local.get $prefix_len)
      (call $fmt_u64 (local.get $n) (i32.add (i32.const 256) (local.get $prefix_len)))))
    (i32.store8 (i32.add (i32.const 256) (local.get $len)) (i32.const 10))
    (i32.store (i32.const 104) (i32.const 256))
    (i32.store (i32.const 108) (i32.add (local.get $len) (i32.const 1)))
    (drop (call $fd_write (i32.const 1) (i32.const 104) (i32.const 1) (i32.const 112))))

  ;; Blocks for $ns nanoseconds on the monotonic clock.
  (func $sleep (param $ns i64)
    (memory.fill (i32.const 0) (i32.const 0) (i32.const 48))
    (i32.store8 (i32.const 8) (i32.const 0))        ;; tag: clock
    (i32.store (i32.const 16) (i32.const 1))        ;; clock id: monotonic
    (i64.store (i32.const 24) (local.get $ns))      ;; timeout (relative)
    (i64.store (i32.const 32) (i64.const 1000000))  ;; precision: 1 ms
    (drop (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 100))))

  ;; Parses argv[1] as a decimal beat limit; 0 (run forever) if absent.
  (func $beat_limit (result i64)
    (local $p i32) (local $c i32) (local $n i64)
    (drop (call $args_sizes_get (i32.const 120) (i32.const 124)))
    (if (i32.lt_u (i32.load (i32.const 120)) (i32.const 2)) (then (return (i64.const 0))))
    (if (i32.gt_u (i32.load (i32.const 124)) (i32.const 4096)) (then (return (i64.const 0))))
    (drop (call $args_get (i32.const 1024) (i32.const 2048)))
    (local.set $p (i32.load (i32.const 1028)))
    (block $done
      (loop $chars
        (local.set $c (i32.load8_u (local.get $p)))
        (br_if $done (i32.lt_u (local.get $c) (i32.const 48)))
        (br_if $done (i32.gt_u (local.get $c) (i32.const 57)))
        (local.set $n (i64.add (i64.mul (local.get $n) (i64.const 10))
          (i64.extend_i32_u (i32.sub (local.get $c) (i32.const 48)))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $chars)))
    (local.get $n))

  (func (export "_start")
    (local $i i64) (local $limit i64)
    (local.set $limit (call $beat_limit))
    (loop $beat
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (call $print_line (i32.const 512) (i32.const 5) (local.get $i))
      (if (i64.eq (local.get $i) (local.get $limit)) (then (return)))
      (call $sleep (i64.const 100000000))
      (br $beat))))
