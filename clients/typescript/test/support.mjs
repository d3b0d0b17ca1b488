// What the node --test suites share: their settings from the environment, and the rejection
// of a promise that must fail.

import assert from "node:assert/strict";

/** The value of an AGENTID_TEST_* variable; the suite is run through `runner` (a pytest file). */
export function env(name, runner) {
  const value = process.env[name];
  assert.ok(value, `${name} is not set: run this through pytest (${runner})`);
  return value;
}

/** What `promise` rejected with; the test fails if it resolves. */
export async function rejection(promise) {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail("expected a rejection");
}
