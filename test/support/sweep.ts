// Removes test/demo domains, /var/tmp dirs and test users left by runs whose process is gone (before the tests); one line per removal, never fails.
import { sweepStaleTestDomains } from './testbed.js';
import { sweepStaleTestUsers } from './users.js';

for (const removed of [...(await sweepStaleTestDomains()), ...sweepStaleTestUsers()]) console.log(`sweep: removed stale ${removed}`);
