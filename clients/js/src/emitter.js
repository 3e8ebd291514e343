// A minimal event emitter: a listener that throws never breaks the client.

export class Emitter {
  constructor() {
    this._listeners = {};
  }

  /** Call `fn` for every `event`; returns a function that removes it. */
  on(event, fn) {
    (this._listeners[event] || (this._listeners[event] = [])).push(fn);
    return () => this.off(event, fn);
  }

  /** Call `fn` for the next `event` only. */
  once(event, fn) {
    const off = this.on(event, function (a, b) {
      off();
      fn(a, b);
    });
    return off;
  }

  /** Remove `fn` (or every listener of `event` when `fn` is omitted). */
  off(event, fn) {
    const list = this._listeners[event];
    if (!list) return;
    if (!fn) {
      delete this._listeners[event];
      return;
    }
    const i = list.indexOf(fn);
    if (i >= 0) list.splice(i, 1);
  }

  emit(event, a, b) {
    const list = this._listeners[event];
    if (!list || !list.length) return false;
    const copy = list.slice();
    for (let i = 0; i < copy.length; i++) {
      try {
        copy[i](a, b);
      } catch (e) {
        if (event !== "listenerError") this.emit("listenerError", e, event);
        else if (typeof console !== "undefined") console.error(e);
      }
    }
    return true;
  }
}
