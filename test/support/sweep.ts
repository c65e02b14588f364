// Removes test/demo domains and /var/tmp dirs left by runs whose process is gone (before the tests); one line per removal, never fails.
import { sweepStaleTestDomains } from './testbed.js';

for (const removed of await sweepStaleTestDomains()) console.log(`sweep: removed stale ${removed}`);
