;; spinner: an infinite loop that never calls the host. Only the engine can stop
;; it: wasmtime fuel (--fuel) or an epoch deadline (--timeout); a signal handler
;; in Python never gets to run while the main thread is inside this loop.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (local $n i64)
    (loop $spin
      (local.set $n (i64.add (local.get $n) (i64.const 1)))
      (br $spin))))
