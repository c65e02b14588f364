// Adjusts the domain XML saved with a backup so that it describes the restored machine (-c/--adjust-config):
// uuid removed (libvirt assigns one), name `restore_<name>` or the one given, every restored disk pointed at its
// restored image with that image's format, without backing stores or encryption, every other disk removed (raw
// disks left out, cdrom/floppy/lun devices unless raw devices are kept), and the NVRAM pointed at its restored
// copy, or dropped so that libvirt creates one for the new machine instead of sharing the original's.
// Guarantees: the XML is edited as a tree in document order, so everything not named here (comments, namespaces,
// unknown elements) comes out as it went in.
import { XMLBuilder, XMLParser, XMLValidator } from 'fast-xml-parser';

/** Where a restored disk now lives. */
export interface RestoredDiskImage {
  /** Image file or block device. */
  path: string;
  format: string;
  /** The image is a block device (disk type 'block'). */
  block?: boolean;
}

export interface AdjustOptions {
  /** New domain name; default `restore_<old name>`. */
  name?: string;
  /** Restored disks by target dev. */
  disks: ReadonlyMap<string, RestoredDiskImage>;
  /** -r: keep cdrom, floppy and lun devices as they are. */
  keepRawDevices: boolean;
  /** The restored copy of the domain's NVRAM; without it the NVRAM path is dropped. */
  nvram?: string;
}

export interface AdjustedConfig {
  xml: string;
  name: string;
  /** One line per change, for the log. */
  changes: string[];
}

const XML_OPTIONS = {
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: '@_',
  commentPropName: '#comment',
  cdataPropName: '#cdata',
  parseTagValue: false,
  parseAttributeValue: false,
  trimValues: false,
} as const;

/** A node of fast-xml-parser's ordered tree: `{ tag: children, ':@': attributes }` or `{ '#text': value }`. */
type XmlNode = Record<string, unknown>;

function tagOf(node: XmlNode): string | undefined {
  return Object.keys(node).find((k) => k !== ':@');
}

function childrenOf(node: XmlNode): XmlNode[] {
  const tag = tagOf(node);
  return tag ? (node[tag] as XmlNode[]) : [];
}

function attributesOf(node: XmlNode): Record<string, string> {
  node[':@'] ??= {};
  return node[':@'] as Record<string, string>;
}

function children(node: XmlNode, tag: string): XmlNode[] {
  return childrenOf(node).filter((c) => tagOf(c) === tag);
}

function child(node: XmlNode, tag: string): XmlNode | undefined {
  return children(node, tag)[0];
}

/** Removes `target` from `parent`, with the indentation before it. */
function removeChild(parent: XmlNode, target: XmlNode): void {
  const list = childrenOf(parent);
  const at = list.indexOf(target);
  if (at < 0) return;
  const before = list[at - 1];
  const indentation = before && tagOf(before) === '#text' && /^\s*$/.test(String(before['#text']));
  list.splice(indentation ? at - 1 : at, indentation ? 2 : 1);
}

function setText(node: XmlNode, text: string): void {
  const tag = tagOf(node) as string;
  node[tag] = [{ '#text': text }];
}

function textOf(node: XmlNode | undefined): string {
  return node ? childrenOf(node).map((c) => String(c['#text'] ?? '')).join('') : '';
}

const REMOVABLE_MEDIA = new Set(['cdrom', 'floppy', 'lun']);

/** fast-xml-parser's complaint in words: for elements left open it prints their names as a JSON array. */
function validatorMessage(msg: string): string {
  const open = /^Invalid '(\[[\s\S]*\])' found\.$/.exec(msg);
  if (open) {
    try {
      return `elements left open: ${(JSON.parse(open[1] as string) as string[]).join(', ')}`;
    } catch {
      // not the array it looked like
    }
  }
  return msg.replace(/\s+/g, ' ');
}

/**
 * Points one disk element at its restored image. Returns whether it dropped an `<encryption>` (of the disk or its
 * source): the backup holds the disk as the guest reads it, decrypted, and the restored image is not encrypted,
 * which QEMU refuses to open as encrypted ("No encryption in image header").
 */
function pointDiskAt(disk: XmlNode, image: RestoredDiskImage): boolean {
  const wasNetwork = attributesOf(disk)['@_type'] === 'network';
  attributesOf(disk)['@_type'] = image.block ? 'block' : 'file';
  let source = child(disk, 'source');
  if (!source) {
    source = { source: [] };
    childrenOf(disk).push(source);
  }
  if (wasNetwork) {
    // What reached the image over the network (hosts, login, TLS, cookies, ...) has no meaning for a file.
    for (const element of [...childrenOf(source)]) if (tagOf(element) !== 'encryption') removeChild(source, element);
    for (const auth of children(disk, 'auth')) removeChild(disk, auth);
  }
  // Only the location changes: dev/file/pool/volume/protocol attributes go, child elements stay.
  source[':@'] = image.block ? { '@_dev': image.path } : { '@_file': image.path };
  // The restored image is the slice the guest read (<slices>), from its first byte: the range would be read again.
  for (const slices of children(source, 'slices')) removeChild(source, slices);
  const driver = child(disk, 'driver');
  if (driver) attributesOf(driver)['@_type'] = image.format;
  for (const backing of children(disk, 'backingStore')) removeChild(disk, backing);
  const encryptions = [disk, source].flatMap((parent) => children(parent, 'encryption').map((e) => ({ parent, e })));
  for (const { parent, e } of encryptions) removeChild(parent, e);
  return encryptions.length > 0;
}

export function adjustDomainConfig(xml: string, options: AdjustOptions): AdjustedConfig {
  // The parser takes damaged XML as it comes (an unclosed element simply ends); a define needs it whole.
  const wellFormed = XMLValidator.validate(xml);
  if (wellFormed !== true) throw new Error(`not well-formed XML (line ${wellFormed.err.line}: ${validatorMessage(wellFormed.err.msg)})`);
  const tree = new XMLParser(XML_OPTIONS).parse(xml) as XmlNode[];
  const domain = tree.find((n) => tagOf(n) === 'domain');
  if (!domain) throw new Error('not a libvirt domain XML (no <domain> element)');
  const changes: string[] = [];

  for (const uuid of children(domain, 'uuid')) {
    removeChild(domain, uuid);
    changes.push('uuid removed');
  }
  const nameNode = child(domain, 'name');
  const oldName = textOf(nameNode);
  const name = options.name ?? `restore_${oldName}`;
  if (nameNode) setText(nameNode, name);
  else childrenOf(domain).unshift({ name: [{ '#text': name }] });
  changes.push(`name ${oldName} -> ${name}`);

  const os = child(domain, 'os');
  const nvram = os && child(os, 'nvram');
  if (os && nvram && options.nvram) {
    setText(nvram, options.nvram);
    changes.push(`nvram -> ${options.nvram}`);
  } else if (os && nvram) {
    removeChild(os, nvram);
    changes.push(`nvram ${textOf(nvram)} dropped (the set holds no copy): libvirt creates a new one`);
  }

  const devices = child(domain, 'devices');
  for (const disk of devices ? children(devices, 'disk') : []) {
    const attrs = attributesOf(disk);
    const device = attrs['@_device'] ?? 'disk';
    const target = attributesOf(child(disk, 'target') ?? {})['@_dev'] ?? '?';
    const image = options.disks.get(target);
    if (image) {
      const decrypted = pointDiskAt(disk, image);
      changes.push(`disk ${target} -> ${image.path} (${image.format})${decrypted ? ', its encryption removed: the backup holds the disk as the guest read it, and the restored image is not encrypted' : ''}`);
    } else if (REMOVABLE_MEDIA.has(device) && options.keepRawDevices) {
      changes.push(`${device} ${target} kept as it is`);
    } else {
      removeChild(devices as XmlNode, disk);
      changes.push(`${device} ${target} removed: ${REMOVABLE_MEDIA.has(device) ? `${device} devices are kept only with -r` : 'not restored'}`);
    }
  }
  return { xml: new XMLBuilder({ ...XML_OPTIONS, suppressEmptyNode: true }).build(tree) as string, name, changes };
}
