// Who else holds an existing restore target (-o naming a raw file or block device), where QEMU's image lock does
// not tell: a loop device it backs, the kernel's swap on it, and processes that have it open for writing without
// that lock (a `qemu-nbd -f raw --cache=none`, dd, any program). A restore would write under each of them.
//   one probe (perl, which Debian always has: perl-base), run here or on the output's host through ssh:
//     the target's identity (a file: device + inode; a block device: its device number)
//     -> each attached loop device's backing file, by its LOOP_GET_STATUS64 identity (its path in
//        /sys/block/loop*/loop/backing_file, " (deleted)" cut, where the ioctl fails)
//     -> each entry of /proc/swaps, by the identity of its path
//     -> each process's fds (/proc/*/fd) opened O_WRONLY or O_RDWR (/proc/*/fdinfo), by identity (a file's fds
//        first by fdinfo's inode number, so that other files are not stat()ed); readers never count
//   -> one line of facts per holder, parsed here.
// Guarantees: only reads (the target is never opened for writing); this process, the probe and their descendants
// are not holders; a host without perl is not known to hold anything (the steps that follow name what fails), and
// any other failure of the probe is an error, never taken for "no holder".
import { LOCAL_HOST, type DomainHost } from '../libvirt/domainHost.js';
import { shellQuote } from '../util/process.js';
import { oneLine } from '../util/errors.js';

export type Holder =
  | { kind: 'loop'; device: string }
  | { kind: 'swap'; file: string }
  | { kind: 'writer'; pid: number; program: string; domain?: string };

/**
 * The probe: `perl -e PROBE target ownPid`. Prints `loop <hex device>`, `swap <hex path>` or
 * `writer <pid> <hex program> <hex domain name>` lines (hex: names may hold any byte). ownPid (0: none) and its
 * descendants are skipped, as is the probe itself.
 */
const PROBE = String.raw`
use strict; use warnings;
my ($target, $own) = @ARGV;
sub ident { my @s = stat($_[0]) or return ''; return -b _ ? "b$s[6]" : "f$s[0]:$s[1]"; }
sub hex_of { return unpack('H*', $_[0] // ''); }
my $want = ident($target);
exit 0 if $want eq '';
# The inode number as fdinfo shows it (the kernel's, which on overlayfs may differ from stat's): a file's quick filter.
my ($ino, $own_fd, $own_info);
if ($want =~ /^f/ && open($own_fd, '<', $target) && open($own_info, '<', '/proc/self/fdinfo/' . fileno($own_fd))) {
  for (<$own_info>) { $ino = $1 if /^ino:\s*(\d+)/; }
}
for my $dir (glob('/sys/block/loop*')) {
  my ($name) = $dir =~ m{([^/]+)$};
  open(my $bf, '<', "$dir/loop/backing_file") or next;
  my $back = <$bf> // ''; chomp $back;
  my $id = '';
  if (open(my $dev, '<', "/dev/$name")) {
    my $info = "\0" x 232;
    if (ioctl($dev, 0x4C05, $info)) {
      my ($d, $i, $r) = unpack('QQQ', $info);
      $id = $want =~ /^b/ ? "b$r" : "f$d:$i";
    }
  }
  if ($id eq '') { $back =~ s/ \(deleted\)$//; $id = ident($back); }
  print 'loop ', hex_of("/dev/$name"), "\n" if $id eq $want;
}
if (open(my $swaps, '<', '/proc/swaps')) {
  <$swaps>;
  while (my $line = <$swaps>) {
    my ($file) = split(/\s+/, $line);
    next unless defined $file;
    $file =~ s/\\([0-7]{3})/chr(oct($1))/ge;
    $file =~ s/ \(deleted\)$//;
    print 'swap ', hex_of($file), "\n" if ident($file) eq $want;
  }
}
opendir(my $proc, '/proc') or exit 0;
my @pids = grep { /^\d+$/ } readdir($proc);
my %parent;
for my $pid (@pids) {
  open(my $st, '<', "/proc/$pid/stat") or next;
  my $stat = <$st> // '';
  $parent{$pid} = $1 if $stat =~ /\)\s+\S+\s+(\d+)/;
}
sub ours {
  my ($p) = @_;
  for (my $n = 0; $p && $n < 4096; $n++) {
    return 1 if $p == $$ || ($own && $p == $own);
    $p = $parent{$p} // 0;
  }
  return 0;
}
PID: for my $pid (@pids) {
  next if ours($pid);
  opendir(my $fds, "/proc/$pid/fd") or next;
  for my $fd (grep { /^\d+$/ } readdir($fds)) {
    open(my $fi, '<', "/proc/$pid/fdinfo/$fd") or next;
    my %info = map { /^(\w+):\s*(\S+)/ ? ($1, $2) : () } <$fi>;
    next unless defined $info{flags};
    my $mode = oct($info{flags}) & 3;
    next unless $mode == 1 || $mode == 2;
    next if defined $ino && defined $info{ino} && $info{ino} ne $ino;
    my $link = readlink("/proc/$pid/fd/$fd") // '';
    next unless $link =~ m{^/};
    next unless ident("/proc/$pid/fd/$fd") eq $want;
    my ($program, $domain) = ('', '');
    if (open(my $cl, '<', "/proc/$pid/cmdline")) {
      local $/; my $cmdline = <$cl> // '';
      my ($argv0) = split(/\0/, $cmdline);
      ($program) = ($argv0 // '') =~ m{([^/]*)$};
      if ($cmdline =~ /\0-name\0guest=((?:[^,\0]|,,)*)/) { ($domain = $1) =~ s/,,/,/g; }
    }
    if (($program // '') eq '' && open(my $cm, '<', "/proc/$pid/comm")) { $program = <$cm> // ''; chomp $program; }
    print "writer $pid ", hex_of($program), ' ', hex_of($domain), "\n";
    next PID;
  }
}
`;

const fromHex = (hex: string | undefined): string => Buffer.from(hex ?? '', 'hex').toString();

/** The probe's lines as holders; lines it does not know are left out. */
export function parseHolders(stdout: string): Holder[] {
  const holders: Holder[] = [];
  for (const line of stdout.split('\n')) {
    const [kind, a, b, c] = line.trim().split(' ');
    if (kind === 'loop' && a) holders.push({ kind, device: fromHex(a) });
    else if (kind === 'swap' && a) holders.push({ kind, file: fromHex(a) });
    else if (kind === 'writer' && /^\d+$/.test(a ?? '')) {
      const domain = fromHex(c);
      holders.push({ kind, pid: Number(a), program: fromHex(b) || 'a process', ...(domain ? { domain } : {}) });
    }
  }
  return holders;
}

/**
 * What holds `file` on `host` besides this run: loop devices it backs, swap on it, and processes with it open for
 * writing. On a host without perl, none is known (left to the steps that follow); any other failure throws.
 */
export async function targetHolders(file: string, host: DomainHost = LOCAL_HOST): Promise<Holder[]> {
  const own = host.remote ? '0' : String(process.pid);
  try {
    return parseHolders((await host.run('perl', ['-e', PROBE, '--', file, own])).stdout);
  } catch (err) {
    // A host without perl is not known to hold anything; any other failure is told, not taken for "none".
    if (/\bperl\b.*\bnot (installed|found)\b/.test(oneLine(err))) return [];
    throw new Error(`cannot tell what holds ${file}${host.remote ? ` on ${host.label}` : ''}: ${oneLine(err)}`, { cause: err });
  }
}

/** A path as one word for the shell the advice is pasted into: quoted only where it needs to be. */
const shellWord = (word: string): string => (/^[\w@%+=:,./-]+$/.test(word) ? word : shellQuote(word));

const listed = (words: string[]): string => (words.length > 1 ? `${words.slice(0, -1).join(', ')} and ${words[words.length - 1]}` : words[0] ?? '');

/**
 * One line refusing `target` (`where`: ' on user@host', or '') for its holders: each named (a loop device, the swap,
 * a program and its pid, a domain's name), and what to do about each.
 */
export function holdersRefusal(target: string, where: string, holders: Holder[]): string {
  const what: string[] = [];
  const todo: string[] = [];
  const loops = holders.flatMap((h) => (h.kind === 'loop' ? [h.device] : []));
  if (loops.length > 0) {
    what.push(`it backs the loop device${loops.length > 1 ? 's' : ''} ${listed(loops)}`);
    todo.push(`detach ${loops.length > 1 ? 'them' : 'it'} (losetup -d ${loops.join(' ')})`);
  }
  const swaps = holders.flatMap((h) => (h.kind === 'swap' ? [h.file] : []));
  if (swaps.length > 0) {
    what.push('it is active swap (/proc/swaps)');
    todo.push(`turn that swap off (swapoff ${swaps.map(shellWord).join(' ')})`);
  }
  const writers = holders.flatMap((h) => (h.kind === 'writer' ? [h] : []));
  if (writers.length > 0) {
    const named = writers.map((h) => `${h.program} (pid ${h.pid}${h.domain ? `, domain '${h.domain}'` : ''})`);
    what.push(`${listed(named)} ${writers.length > 1 ? 'hold' : 'holds'} it open for writing`);
    // A domain's QEMU is ended through libvirt (virsh shutdown), not by its pid.
    const domains = [...new Set(writers.flatMap((h) => (h.domain ? [`'${h.domain}'`] : [])))];
    const others = writers.filter((h) => !h.domain).length;
    if (domains.length > 0) todo.push(`shut down the domain${domains.length > 1 ? 's' : ''} ${listed(domains)}`);
    if (others > 0) todo.push(`stop ${others > 1 ? 'those processes' : 'that process'}`);
  }
  return `${target}${where} is in use: ${what.join(', and ')}, so it was left untouched; ${todo.join(', ')}, or restore to another file or into a directory`;
}
