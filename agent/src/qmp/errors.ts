import { FtkvmError } from '../util/errors.ts';

/** Connecting to the QMP socket failed (no such socket, refused, greeting never came). */
export class QmpConnectError extends FtkvmError {
  constructor(message: string, cause?: unknown) { super('QMP_CONNECT_FAILED', message, { cause }); }
}
/** The command got no reply in time. The connection stays usable; a late reply is discarded. */
export class QmpTimeoutError extends FtkvmError {
  readonly command: string;
  constructor(command: string, ms: number) {
    super('QMP_TIMEOUT', `QMP command ${command} got no reply within ${ms} ms`);
    this.command = command;
  }
}
/** The connection closed (QEMU exited or was killed) while a command was outstanding. */
export class QmpDisconnectedError extends FtkvmError {
  readonly command: string | undefined;
  constructor(command: string | undefined, cause?: unknown) {
    super('QMP_DISCONNECTED', command ? `QMP connection closed while waiting for ${command} (QEMU gone?)` : 'QMP connection is closed', { cause });
    this.command = command;
  }
}
/** QEMU answered with an error object. */
export class QmpCommandError extends FtkvmError {
  readonly command: string;
  readonly errorClass: string;
  readonly desc: string;
  constructor(command: string, errorClass: string, desc: string) {
    super('QMP_COMMAND_FAILED', `QMP ${command} failed: ${errorClass}: ${desc}`);
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}
/** The peer spoke something that is not QMP; the connection is closed. */
export class QmpProtocolError extends FtkvmError {
  constructor(message: string, cause?: unknown) { super('QMP_PROTOCOL', message, { cause }); }
}
