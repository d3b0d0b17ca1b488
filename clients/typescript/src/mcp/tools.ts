/** Per-tool declarations: which Check a tool call is (action, resource, context), from its
 * arguments. */

import { ContextError, toContext } from "../context.js";

/** How one tool's calls are checked. Every field is optional: a tool with no declaration is
 * checked with the default action and nothing else. */
export interface ToolDeclaration {
  /** The Check's action (default `mcp.<serverName>.<tool name>`). */
  action?: string;
  /** A template over the call's arguments, e.g. `account/{account_id}` (default ""): each
   * `{name}` is that argument, a string or an integer that makes one resource segment. */
  resource?: string;
  /** Which arguments become the Check's context (what risk rules see): a list of argument
   * names (each its own key), or a map of context key -> argument name (default none). */
  context?: readonly string[] | Readonly<Record<string, string>>;
}

/** What a tool call is checked as. */
export interface ToolCheck {
  action: string;
  resource: string;
  context: Record<string, unknown> | undefined;
}

/** A call refused before any Check: an argument a declaration names is missing or cannot be
 * encoded. The message names the argument, never its value. */
export class ToolCallRefused extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ToolCallRefused";
  }
}

const ACTION = /^[a-z0-9_-]+(\.[a-z0-9_-]+)*$/;
const PLACEHOLDER = /\{([^{}]*)\}/g;
// A resource segment (docs/api.md "Scopes"): 1-128 printable non-space characters but "/";
// never "*" or "**", which a scope reads as wildcards.
const SEGMENT = /^[\x21-\x2e\x30-\x7e\u00a0-\uffff]{1,128}$/u;

/** A declaration checked once, at start: a bad action, template or mapping is a TypeError
 * there rather than a refused call later. */
export class CompiledTool {
  readonly #action: string | undefined;
  readonly #template: string;
  readonly #context: ReadonlyArray<[string, string]> | undefined;

  constructor(tool: string, declaration: ToolDeclaration) {
    const where = `tool ${JSON.stringify(tool)}`;
    if (declaration.action !== undefined && !ACTION.test(declaration.action)) {
      throw new TypeError(`${where}: action ${JSON.stringify(declaration.action)} is not an action`);
    }
    this.#action = declaration.action;
    this.#template = declaration.resource ?? "";
    const literal = this.#template.replace(PLACEHOLDER, (_, name: string) => {
      if (!name) throw new TypeError(`${where}: an empty {} in the resource template`);
      return "x";
    });
    if (/[{}]/.test(literal)) throw new TypeError(`${where}: unbalanced braces in the resource template`);
    const context = declaration.context;
    if (context !== undefined) {
      const pairs: Array<[string, string]> = Array.isArray(context)
        ? (context as string[]).map((name) => [name, name])
        : Object.entries(context);
      for (const [key, argument] of pairs) {
        if (typeof argument !== "string" || !argument || !key) {
          throw new TypeError(`${where}: context names arguments by non-empty strings`);
        }
      }
      this.#context = pairs;
    }
  }

  /** The Check for a call with these arguments; ToolCallRefused if one it names is missing or
   * cannot be encoded (nothing is guessed). */
  check(serverName: string, tool: string, args: Record<string, unknown>): ToolCheck {
    const action = this.#action ?? `mcp.${serverName}.${tool}`;
    if (!ACTION.test(action)) {
      throw new ToolCallRefused(
        `the tool name ${JSON.stringify(tool)} makes no action (${action}): declare its action`,
      );
    }
    const resource = this.#template.replace(PLACEHOLDER, (_, name: string) => segment(args, name));
    let context: Record<string, unknown> | undefined;
    if (this.#context !== undefined) {
      context = {};
      for (const [key, name] of this.#context) {
        if (!Object.hasOwn(args, name) || args[name] === undefined) {
          throw new ToolCallRefused(`the argument ${JSON.stringify(name)} is missing (the context names it)`);
        }
        context[key] = args[name];
      }
      try {
        context = toContext(context);
      } catch (error) {
        if (error instanceof ContextError) throw new ToolCallRefused(error.message);
        throw error;
      }
    }
    return { action, resource, context };
  }
}

function segment(args: Record<string, unknown>, name: string): string {
  if (!Object.hasOwn(args, name) || args[name] === undefined) {
    throw new ToolCallRefused(`the argument ${JSON.stringify(name)} is missing (the resource names it)`);
  }
  const value = args[name];
  const text = typeof value === "string" ? value : Number.isSafeInteger(value) ? String(value) : undefined;
  if (text === undefined || !SEGMENT.test(text) || text === "*" || text === "**") {
    throw new ToolCallRefused(
      `the argument ${JSON.stringify(name)} cannot be a resource segment ` +
        "(a string or integer of 1-128 printable characters, no spaces or /, not * or **)",
    );
  }
  return text;
}
