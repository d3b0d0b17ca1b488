/** Where a client connects, and whether a credential may travel there in plaintext. */

import { isIP } from "node:net";

/**
 * Is this gRPC target on this machine: localhost or a loopback address? Accepts host:port,
 * [v6]:port and the resolver forms dns:///host:port, ipv4:host:port, ipv6:[v6]:port; a list of
 * addresses (ipv4:a,b) is never local, as one remote address among them is enough to refuse.
 */
export function isLocalTarget(target: string): boolean {
  if (target.includes(",")) return false;
  const host = targetHost(target);
  if (host.toLowerCase() === "localhost") return true;
  switch (isIP(host)) {
    case 4:
      return host.split(".")[0] === "127";
    case 6:
      return isIPv6Loopback(host);
    default:
      return false;
  }
}

/** The host of a target (no brackets around an IPv6 address), its resolver scheme dropped. */
export function targetHost(target: string): string {
  const address = hostPort(target);
  if (address.startsWith("[")) return address.slice(1, address.indexOf("]"));
  if (address.split(":").length === 2) return address.slice(0, address.lastIndexOf(":"));
  return address; // no port, or a bare IPv6 address
}

/** host:port of a target, without dns:///, ipv4: or ipv6: in front. */
export function hostPort(target: string): string {
  let address = target.slice(target.lastIndexOf("/") + 1); // dns:///h:p, dns://resolver/h:p
  for (const scheme of ["dns:", "ipv4:", "ipv6:"]) {
    if (address.startsWith(scheme)) address = address.slice(scheme.length);
  }
  return address;
}

/** The URL Connect's gRPC transport is given for a target. */
export function baseUrl(target: string, tls: boolean): string {
  let address = hostPort(target);
  if (isIP(address) === 6) address = `[${address}]`; // a bare IPv6 address, no port
  const url = new URL(`${tls ? "https" : "http"}://${address}`);
  return url.origin;
}

function isIPv6Loopback(host: string): boolean {
  const lower = host.toLowerCase();
  if (lower.startsWith("::ffff:")) {
    const mapped = lower.slice("::ffff:".length);
    return isIP(mapped) === 4 && mapped.split(".")[0] === "127";
  }
  // ::1 in any spelling: every group zero but the last, which is 1.
  const [head = "", tail = ""] = lower.split("::");
  const groups = lower.includes("::")
    ? [...head.split(":").filter(Boolean), ...Array(8).fill("0"), ...tail.split(":").filter(Boolean)]
    : lower.split(":");
  const last = groups[groups.length - 1] ?? "";
  return parseInt(last, 16) === 1 && groups.slice(0, -1).every((group) => parseInt(group, 16) === 0);
}
