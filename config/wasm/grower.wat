;; grower: grows its linear memory one 64 KiB page at a time until memory.grow
;; returns -1 (the runner's --memory cap, or the 4 GiB wasm32 limit), prints
;; "granted <bytes>" once, then keeps running: every 100 ms it prints
;; "alive N" and retries one page, so a capped tenant is visibly *not killed*
;; and keeps getting denials.
;;
;; Denials are invisible to the host through the wasmtime Python API (the store
;; limiter has no callback), so this module reports each one itself through the
;; runner's optional import supervisord.memory_denied (see runner.py).
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "supervisord" "memory_denied" (func $memory_denied))
  (memory (export "memory") 1)

  ;; Layout as in heartbeat.wat: 0..48 subscription, 64..96 event, 100 nevents,
  ;; 104 iovec, 112 nwritten, 200..232 digit scratch, 256.. output line, 512.. text.
  (data (i32.const 512) "granted ")
  (data (i32.const 528) "alive ")

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

  (func (export "_start")
    (local $i i64)
    (block $full
      (loop $grow
        (br_if $full (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $grow)))
    (call $memory_denied)
    (call $print_line (i32.const 512) (i32.const 8)
      (i64.mul (i64.extend_i32_u (memory.size)) (i64.const 65536)))
    (loop $alive
      (call $sleep (i64.const 100000000))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1))
        (then (call $memory_denied)))
      (call $print_line (i32.const 528) (i32.const 6) (local.get $i))
      (br $alive))))
