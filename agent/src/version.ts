// Filled in by the bundler (scripts/build.mjs); "dev" when running from source.
declare const __FTKVM_VERSION__: string | undefined;
declare const __FTKVM_COMMIT__: string | undefined;
export const VERSION = typeof __FTKVM_VERSION__ === 'string' ? __FTKVM_VERSION__ : '0.0.0-dev';
export const COMMIT = typeof __FTKVM_COMMIT__ === 'string' ? __FTKVM_COMMIT__ : 'source';
