// Errors carry a stable machine-readable code (for logs, API bodies and tests) and the
// underlying cause, in the style of qemu.qmp / ioredis.
export class FtkvmError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** Message of an unknown thrown value, never throws itself. */
export function errorMessage(e: unknown): string {
  if (e instanceof Error) return e.message;
  return String(e);
}

/** Error code of an unknown thrown value (FtkvmError code, Node errno code, or 'UNKNOWN'). */
export function errorCode(e: unknown): string {
  if (e instanceof FtkvmError) return e.code;
  if (e && typeof e === 'object' && 'code' in e && typeof (e as { code: unknown }).code === 'string') {
    return (e as { code: string }).code;
  }
  return 'UNKNOWN';
}
