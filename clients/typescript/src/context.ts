/** A Check's or StepUp's `context`, from a plain JS object to a google.protobuf.Struct. */

import type { JsonObject, JsonValue } from "@bufbuild/protobuf";

/** A context value that google.protobuf.Struct cannot carry; `path` says where it is. */
export class ContextError extends TypeError {
  constructor(
    readonly path: string,
    what: string,
  ) {
    super(`context${path}: ${what} cannot be sent in a google.protobuf.Struct`);
    this.name = "ContextError";
  }
}

/**
 * Checks that `context` is JSON a Struct carries exactly (a plain object of null, booleans,
 * finite numbers, strings, arrays and plain objects, no cycles) and returns it. Anything else
 * (undefined, functions, symbols, bigint, NaN, Infinity, Dates, Maps, class instances, a cycle)
 * is a ContextError here, instead of a value dropped on the way and an empty or partial context
 * reaching the risk rules, which fail closed and answer STEP_UP_REQUIRED with no hint why.
 * Numbers travel as doubles: a bigint is refused rather than rounded (send a string).
 */
export function toContext(context: Record<string, unknown>): JsonObject {
  if (!isPlainObject(context)) throw new ContextError("", describe(context));
  return checkObject(context, "", new Set()) as JsonObject;
}

function check(value: unknown, path: string, seen: Set<object>): JsonValue {
  if (value === null || typeof value === "string" || typeof value === "boolean") return value;
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new ContextError(path, String(value));
    return value;
  }
  if (Array.isArray(value)) {
    enter(value, path, seen);
    const items: JsonValue[] = [];
    for (let i = 0; i < value.length; i++) {
      if (!(i in value)) throw new ContextError(`${path}[${i}]`, "an array hole");
      items.push(check(value[i], `${path}[${i}]`, seen));
    }
    seen.delete(value);
    return items;
  }
  if (isPlainObject(value)) return checkObject(value, path, seen);
  throw new ContextError(path, describe(value));
}

function checkObject(value: Record<string, unknown>, path: string, seen: Set<object>): JsonValue {
  enter(value, path, seen);
  if (Object.getOwnPropertySymbols(value).length > 0) {
    throw new ContextError(path, "a symbol key");
  }
  const out: { [key: string]: JsonValue } = {};
  for (const [key, item] of Object.entries(value)) {
    out[key] = check(item, `${path}.${key}`, seen);
  }
  seen.delete(value);
  return out;
}

function enter(value: object, path: string, seen: Set<object>): void {
  if (seen.has(value)) throw new ContextError(path, "a cycle (an object inside itself)");
  seen.add(value);
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (typeof value !== "object" || value === null) return false;
  const prototype: unknown = Object.getPrototypeOf(value);
  return prototype === Object.prototype || prototype === null;
}

function describe(value: unknown): string {
  if (value === undefined) return "undefined";
  if (typeof value === "function") return "a function";
  if (typeof value === "symbol") return "a symbol";
  if (typeof value === "bigint") return `a bigint (${value}n; send it as a string or a number)`;
  if (value instanceof Date) return "a Date (send date.toISOString())";
  if (typeof value === "object" && value !== null) {
    return `a ${value.constructor?.name ?? "non-plain"} object (only plain objects and arrays)`;
  }
  return typeof value;
}
