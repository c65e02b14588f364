// Reads exact byte counts from a socket, for a protocol read one message at a time. Guarantees: at most one
// read waits at a time; the socket is paused while more than HIGH_WATER bytes sit unread, so a client that
// sends faster than requests are served does not grow memory; a closed socket fails the waiting read; detach()
// lets go of the socket (for STARTTLS, which hands it to TLS) and says how many bytes were read ahead.
import type { Socket } from 'node:net';

const HIGH_WATER = 8 * 1024 * 1024;

export class SocketClosedError extends Error {
  constructor() {
    super('connection closed');
    this.name = 'SocketClosedError';
  }
}

export class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private closed = false;
  private waiter: { length: number; resolve: (data: Buffer) => void; reject: (err: Error) => void } | undefined;

  private readonly onData = (chunk: Buffer): void => {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    if (this.buffered >= HIGH_WATER && (!this.waiter || this.buffered >= this.waiter.length)) this.socket.pause();
    this.serve();
  };

  private readonly onClose = (): void => {
    this.closed = true;
    this.serve();
  };

  constructor(private readonly socket: Socket) {
    socket.on('data', this.onData);
    socket.on('end', this.onClose);
    socket.on('close', this.onClose);
  }

  /**
   * Stops reading the socket, which something else (TLS) then reads; returns the bytes read ahead and not taken
   * (a client that sent more before the reply it waits for), which that reader would never see.
   */
  detach(): number {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onClose);
    this.socket.off('close', this.onClose);
    return this.buffered;
  }

  /** The next `length` bytes; rejects with SocketClosedError if the peer goes away first. */
  read(length: number): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error('SocketReader: a read is already waiting'));
    if (this.buffered >= length) return Promise.resolve(this.take(length));
    if (this.closed) return Promise.reject(new SocketClosedError());
    this.socket.resume();
    return new Promise((resolve, reject) => {
      this.waiter = { length, resolve, reject };
    });
  }

  private serve(): void {
    const waiter = this.waiter;
    if (!waiter) return;
    if (this.buffered >= waiter.length) {
      this.waiter = undefined;
      waiter.resolve(this.take(waiter.length));
    } else if (this.closed) {
      this.waiter = undefined;
      waiter.reject(new SocketClosedError());
    }
  }

  private take(length: number): Buffer {
    this.buffered -= length;
    if (this.buffered < HIGH_WATER) this.socket.resume();
    const first = this.chunks[0];
    if (first && first.length >= length) {
      if (first.length === length) this.chunks.shift();
      else this.chunks[0] = first.subarray(length);
      return first.subarray(0, length);
    }
    const out = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const chunk = this.chunks[0] as Buffer;
      const step = Math.min(chunk.length, length - done);
      chunk.copy(out, done, 0, step);
      done += step;
      if (step === chunk.length) this.chunks.shift();
      else this.chunks[0] = chunk.subarray(step);
    }
    return out;
  }
}
