// The engine as a library: back up, restore and inspect virtnbdbackup-compatible backup sets from your own
// program. The commands in src/cli are thin fronts over exactly these functions.
export { backup, type BackupOptions, type BackupResult, type DiskResult } from './backup/backup.js';
export {
  restore, dump, applyStream, loadChains, type RestoreOptions, type RestoredDisk, type RestoreResult, type ApplyOptions,
} from './restore/restore.js';
export { planRestore, chainFromSequence, type RestorePlan, type DiskPlan } from './restore/plan.js';
export { adjustDomainConfig, type AdjustOptions, type AdjustedConfig } from './restore/vmconfig.js';
export { verifySet, verifyDataFile, type VerifyOptions, type FileVerdict } from './verify/verify.js';
export { StreamReader, type StreamRecord } from './stream/reader.js';
export { writeStream, type StreamWriteOptions, type StreamWriteResult } from './stream/writer.js';
export * from './stream/format.js';
export { NbdEndpoint, type NbdAddress, type NbdOpenOptions } from './endpoint/nbd.js';
export * from './endpoint/endpoint.js';
export { planFull, planDirty, ExtentList, type ExtentPlan, type ExtentSequence, type PlannedExtent } from './extents/plan.js';
export { parseDomainXml, selectDisks, type DomainDisk, type DomainInfo } from './libvirt/domainXml.js';
export { planCheckpoint, type CheckpointPlan, type Level } from './libvirt/checkpoints.js';
export { listSet, readChains, checkLinks, dataFileName, type ChainLink, type DataFile } from './set/backupSet.js';
export { Logger } from './util/log.js';
export { UserError } from './util/errors.js';
export { endBackupJob, type EndJobOptions } from './backup/jobControl.js';
export { startMap, type MapOptions, type MapSession } from './map/map.js';
export { ChainEndpoint, type ChainOpenOptions } from './map/chainEndpoint.js';
export { CopyOnWriteEndpoint } from './map/copyOnWrite.js';
