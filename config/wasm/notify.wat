;; notify: a WebAssembly tenant that reports readiness and liveness to the daemon, as a
;; program written for systemd's Type=notify would over sd_notify.
;;
;; It says STATUS=serving and READY=1 through the runner's optional `supervisord`
;; imports, then sends WATCHDOG=1 every 200 ms, forever. Run it with
;; `ready = "notify"` (it is `starting` until READY=1) and, say, `watchdog = 2`.
;; Each import returns 1 once sent, 0 when the worker has no NOTIFY_SOCKET, -1 on a
;; failed send; this module does not care which.
(module
  (import "supervisord" "ready" (func $ready (result i32)))
  (import "supervisord" "watchdog" (func $watchdog (result i32)))
  (import "supervisord" "status" (func $status (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)

  ;; Layout: 0..48 subscription, 64..96 event, 100 nevents, 512 status text.
  (data (i32.const 512) "serving")

  ;; Blocks for $ns nanoseconds on the monotonic clock (no CPU spent waiting).
  (func $sleep (param $ns i64)
    (memory.fill (i32.const 0) (i32.const 0) (i32.const 48))
    (i32.store8 (i32.const 8) (i32.const 0))        ;; tag: clock
    (i32.store (i32.const 16) (i32.const 1))        ;; clock id: monotonic
    (i64.store (i32.const 24) (local.get $ns))      ;; timeout (relative)
    (i64.store (i32.const 32) (i64.const 1000000))  ;; precision: 1 ms
    (drop (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 100))))

  (func (export "_start")
    (drop (call $status (i32.const 512) (i32.const 7)))
    (drop (call $ready))
    (loop $alive
      (drop (call $watchdog))
      (call $sleep (i64.const 200000000))
      (br $alive))))
